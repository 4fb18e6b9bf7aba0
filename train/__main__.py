"""`python train`, `accelerate launch train`, `python -m train`, `accelerate launch -m train`.

Run as a folder (`python train`), Python puts this folder itself first on sys.path, where
train/data.py, train/config.py, ... would shadow top-level modules of those names and
`import train` would fail. Put the repo root there instead.
"""
import sys
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

from train.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
