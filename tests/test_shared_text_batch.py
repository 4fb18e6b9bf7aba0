"""The one pad-and-mask of trimmed text (shared/text.py), against torch's own pad_sequence."""
import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from shared.text_batch import pad_and_mask, pad_text


def _states(lengths, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for n in lengths]


@pytest.mark.parametrize("multiple", [None, 16])
def test_pad_and_mask_pads_to_the_longest_and_masks_the_padding(multiple):
    lengths = [3, 7, 5]
    states = _states(lengths)
    t5, mask = pad_and_mask(states, multiple)
    width = 7 if multiple is None else 16
    assert t5.shape == (3, width, 4) and mask.shape == (3, width) and mask.dtype == torch.bool
    assert torch.equal(t5[:, :7], pad_sequence(states, batch_first=True))
    assert not t5[:, 7:].any()
    assert mask.tolist() == [[i < n for i in range(width)] for n in lengths]


def test_pad_and_mask_fills_an_uninitialized_buffer_and_zeroes_its_padding():
    states = _states([2, 6], dim=3)
    buffers = []

    def alloc(shape):
        buffers.append(torch.full(shape, float("nan")))
        return buffers[-1]

    t5, mask = pad_and_mask(states, None, alloc=alloc)
    assert t5 is buffers[0]
    assert torch.equal(t5, pad_sequence(states, batch_first=True))
    assert mask.sum(1).tolist() == [2, 6]


def test_pad_text_extends_states_and_mask_with_masked_zeros():
    t5 = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out, out_mask = pad_text(t5, mask, 5)
    assert torch.equal(out, torch.cat([t5, torch.zeros(2, 2, 4)], 1))
    assert out_mask.tolist() == [[True, True, False, False, False], [True, True, True, False, False]]
    single, single_mask = pad_text(t5[0], None, 4)   # one prompt's [L, D], every token real
    assert torch.equal(single, torch.cat([t5[0], torch.zeros(1, 4)]))
    assert single_mask.tolist() == [True, True, True, False]
    same, same_mask = pad_text(t5, mask, 3)
    assert same is t5 and same_mask is mask
    with pytest.raises(ValueError, match="cannot pad 3 text positions to 2"):
        pad_text(t5, mask, 2)
