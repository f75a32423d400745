"""The confidence interval benchmarks/bench_accounting_trees.py reports for its median."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_accounting_trees import median_interval


def test_too_few_rounds_give_no_interval() -> None:
    assert median_interval([0.9, 1.0, 1.1, 1.0, 0.95]) is None


def test_the_ranks_of_the_usual_tables() -> None:
    # n = 6: the extremes (96.9 %); 16: 4th to 13th; 40: 14th to 27th; 60: 22nd to 39th.
    for n, low, high in ((6, 1, 6), (16, 4, 13), (40, 14, 27), (60, 22, 39)):
        values = [float(rank) for rank in range(n, 0, -1)]  # unsorted on purpose
        assert median_interval(values) == (low, high)


def test_the_interval_holds_the_median() -> None:
    values = [0.93, 1.02, 0.88, 0.97, 0.95, 1.05, 0.91, 0.94, 0.99, 0.96, 0.92, 0.90]
    low, high = median_interval(values) or (0.0, 0.0)
    assert low < sorted(values)[6] < high
