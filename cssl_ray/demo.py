"""``python -m cssl_ray.demo``: the command lives in cssl_ray/experiments/demo.py."""
import sys

from cssl_ray.experiments.demo import main

if __name__ == "__main__":
    sys.exit(main())
