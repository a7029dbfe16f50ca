"""``python -m cssl_ray.tune``: the command lives in cssl_ray/experiments/tune.py."""
import sys

from cssl_ray.experiments.tune import main

if __name__ == "__main__":
    sys.exit(main())
