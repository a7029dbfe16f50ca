"""``python -m cssl_ray.predict``: the command lives in cssl_ray/experiments/predict.py."""
import sys

from cssl_ray.experiments.predict import main

if __name__ == "__main__":
    sys.exit(main())
