"""``python -m cssl_ray.ablate``: the command lives in cssl_ray/experiments/ablate.py."""
import sys

from cssl_ray.experiments.ablate import main

if __name__ == "__main__":
    sys.exit(main())
