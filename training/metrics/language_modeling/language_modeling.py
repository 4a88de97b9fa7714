"""Language-modeling metric: loss, perplexity, bits per token and bits per character from summed token NLLs.

Loaded by path, never from the Hub: `evaluate.load("training/metrics/language_modeling")`. Feed it, per
sequence, the summed negative log-likelihood (natural log) of its predicted tokens and how many tokens that is;
the metric pools them over the whole evaluation (a mean of per-batch perplexities would be biased).
"""

import math

import datasets
import evaluate

_DESCRIPTION = """
Token-pooled language-modeling metrics. loss = sum(nll) / sum(tokens) (nats per token);
perplexity = exp(loss); bits_per_token = loss / ln 2; bits_per_character = bits_per_token * tokens per character,
when `characters_per_token` is given to `compute` (the text's character count over its token count).
"""

_KWARGS_DESCRIPTION = """
Args:
    nll_sum (`list[float]`): summed natural-log negative log-likelihood of each sequence's predicted tokens.
    num_tokens (`list[int]`): number of predicted tokens in each sequence.
    characters_per_token (`float`, optional): characters of text per token, for bits per character.
Returns:
    loss, perplexity, bits_per_token, bits_per_character (None without characters_per_token), num_tokens.
Examples:
    >>> metric = evaluate.load("training/metrics/language_modeling")
    >>> metric.compute(nll_sum=[2 * math.log(4)], num_tokens=[2])["perplexity"]
    4.0
"""


class LanguageModeling(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll_sum": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll_sum, num_tokens, characters_per_token=None):
        total_tokens = sum(num_tokens)
        if total_tokens <= 0:
            raise ValueError("language_modeling: no tokens were evaluated; the validation split may be empty")
        loss = math.fsum(nll_sum) / total_tokens
        bits_per_token = loss / math.log(2)
        bits_per_character = None
        if characters_per_token:
            bits_per_character = bits_per_token / characters_per_token
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if loss < 700 else math.inf,
            "bits_per_token": bits_per_token,
            "bits_per_character": bits_per_character,
            "num_tokens": total_tokens,
        }
