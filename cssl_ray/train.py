"""``python -m cssl_ray.train``: the command lives in cssl_ray/experiments/train.py."""
import sys

from cssl_ray.experiments.train import main

if __name__ == "__main__":
    sys.exit(main())
