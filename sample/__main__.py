"""`python -m sample ...`."""
from sample.cli import main

main()
