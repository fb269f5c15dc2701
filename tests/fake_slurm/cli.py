"""Entry point of the fake Slurm's executables: `cli.py COMMAND ARGS` (see ./sbatch)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the package
from fake_slurm.commands import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
