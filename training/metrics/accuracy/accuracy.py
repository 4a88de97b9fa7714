"""Classification accuracy, loaded by path and never from the Hub: `evaluate.load("training/metrics/accuracy")`.

The same inputs and results as the Hub's "accuracy" metric: the share of predictions equal to their reference
(`normalize=False`: the count), optionally weighted per example.
"""

import datasets
import evaluate

_DESCRIPTION = """
Accuracy = (number of predictions equal to their reference) / (number of examples). With `sample_weight`, each
example counts with its weight; with `normalize=False` the (weighted) number of correct predictions is returned.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted label ids.
    references (`list[int]`): true label ids.
    normalize (`bool`, defaults to True): return the fraction (True) or the count (False) of correct predictions.
    sample_weight (`list[float]`, optional): a weight per example.
Returns:
    accuracy (`float`): in [0, 1] when normalized, else the (weighted) count of correct predictions.
Examples:
    >>> metric = evaluate.load("training/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'accuracy': 0.75}
"""


class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        if not references:
            raise ValueError("accuracy: no examples were given; the evaluation split may be empty")
        weights = [1.0] * len(references) if sample_weight is None else [float(w) for w in sample_weight]
        if len(weights) != len(references):
            raise ValueError(f"accuracy: {len(weights)} sample weights for {len(references)} examples")
        correct = sum(w for p, r, w in zip(predictions, references, weights) if p == r)
        return {"accuracy": float(correct / sum(weights) if normalize else correct)}
