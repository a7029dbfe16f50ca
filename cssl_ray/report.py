"""``python -m cssl_ray.report``: the command lives in cssl_ray/experiments/report.py."""
import sys

from cssl_ray.experiments.report import main

if __name__ == "__main__":
    sys.exit(main())
