"""`python -m preprocess ...` and `accelerate launch -m preprocess encode ...`."""
from preprocess.cli import main

main()
