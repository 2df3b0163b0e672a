"""Train a small CNN on scikit-learn's digits with the full gapwatch suite.

python examples/train_digits.py --epochs 30
tensorboard --logdir gapwatch_runs
"""

from gapwatch.demo import main

if __name__ == "__main__":
    main()
