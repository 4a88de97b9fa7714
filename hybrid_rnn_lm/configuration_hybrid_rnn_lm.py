"""Configuration of the hybrid recurrent + attention language model."""

import math

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

FUSED_RNN_TYPES = ("rnn", "gru", "lstm")  # torch's fused nn.RNN / nn.GRU / nn.LSTM: a sequential loop over time
SCAN_RNN_TYPES = ("mingru", "minlstm")  # gates from the input only: a whole block at once with a parallel scan
RNN_TYPES = FUSED_RNN_TYPES + SCAN_RNN_TYPES
MAX_VOCAB_SIZE = 2**24  # 16.8M tokens: far above any real vocabulary, far below an embedding that cannot be allocated


class HybridRnnLmConfig(PreTrainedConfig):
    r"""
    Configuration of a [`HybridRnnLmModel`]: a stack of pre-norm residual blocks, each made of a recurrent mixer
    (RNN / GRU / LSTM), an optional causal self-attention and an MLP.

    The layer pattern is data: `attention_layers` says which blocks carry attention, so the pure-RNN ablation,
    attention everywhere and Griffin-style "every k-th layer" layouts are all the same model class.

    Args:
        vocab_size (`int`, defaults to 256): size of the token vocabulary.
        hidden_size (`int`, defaults to 256): width of the residual stream and of the recurrent state.
        num_hidden_layers (`int`, defaults to 4): number of blocks.
        rnn_type (`str`, defaults to `"gru"`): recurrent cell, one of `"rnn"` (tanh Elman), `"gru"`, `"lstm"` (torch's
            fused cells, sequential over time) or `"mingru"`, `"minlstm"` (Feng et al. 2024, "Were RNNs All We
            Needed?": gates that depend on the input only, so training and prefill run a parallel scan; built from
            `nn.Linear`, so LoRA reaches them).
        scan_chunk_size (`int`, defaults to 4): time steps per chunk of the parallel scan of `mingru` / `minlstm`
            (a scan inside each chunk, then the same scan over the chunk ends). Only speed depends on it, never the
            result; `benchmarks/training_throughput.py --chunk-sizes` measures it.
        num_attention_heads (`int`, defaults to 4): heads of every attention layer; must divide `hidden_size`.
        attention_layers (`str | int | list[int]`, defaults to `"all"`): which blocks carry attention:
            `"all"`, `"none"` (pure recurrent model), an int `k` (every k-th block: blocks k-1, 2k-1, ...), or an
            explicit list of block indices.
        attention_window (`int`, *optional*): `None` for full causal attention, else a sliding window of this many
            tokens (the token itself included); the generation cache then keeps only the last `attention_window`
            keys/values.
        intermediate_size (`int`, *optional*): MLP width; defaults to `4 * hidden_size`.
        hidden_act (`str`, defaults to `"gelu"`): the MLP's activation, any name of transformers' `ACT2FN`
            (`"gelu"`, `"relu"`, `"relu2"` (squared ReLU), `"silu"`, ...).
        hidden_dropout (`float`, defaults to 0.0): dropout on embeddings and on every sub-layer output.
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of the layer norms.
        use_residual (`bool`, defaults to `True`): residual connections around every sub-layer. `False` is an
            ablation: each sub-layer then replaces the stream instead of adding to it.
        bidirectional (`bool`, defaults to `False`): bidirectional recurrence and attention, for encoder use
            (sequence classification) only. A causal language model refuses it.
        tie_word_embeddings (`bool`, defaults to `True`): share the input embedding and output projection.
        initializer_range (`float`, defaults to 0.02): std of the normal initialisation of linear/embedding weights.
        use_cache (`bool`, defaults to `True`): return a cache (recurrent states + keys/values) for generation.
        pad_token_id / bos_token_id / eos_token_id (`int`, *optional*): special token ids.

    Example:

    ```python
    >>> from hybrid_rnn_lm import HybridRnnLmConfig, HybridRnnLmForCausalLM
    >>> config = HybridRnnLmConfig(vocab_size=100, rnn_type="lstm", attention_layers=2, attention_window=64)
    >>> model = HybridRnnLmForCausalLM(config)
    ```
    """

    model_type = "hybrid_rnn_lm"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 256,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        rnn_type: str = "gru",
        scan_chunk_size: int = 4,
        num_attention_heads: int = 4,
        attention_layers: str | int | list[int] = "all",
        attention_window: int | None = None,
        intermediate_size: int | None = None,
        hidden_act: str = "gelu",
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
        use_residual: bool = True,
        bidirectional: bool = False,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs,
    ):
        # Derived fields come back from config.json; they are recomputed below, never trusted.
        for derived in ("layer_types", "sliding_window", "is_causal"):
            kwargs.pop(derived, None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.rnn_type = rnn_type
        self.scan_chunk_size = scan_chunk_size
        self.num_attention_heads = num_attention_heads
        self.attention_layers = list(attention_layers) if isinstance(attention_layers, tuple) else attention_layers
        self.attention_window = attention_window
        self.intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.layer_norm_eps = layer_norm_eps
        self.use_residual = use_residual
        self.bidirectional = bidirectional
        self.tie_word_embeddings = tie_word_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self._validate_fields()

        # What transformers reads: one cache slot per block. A block without attention only keeps a recurrent
        # state ("linear_attention"); a block with attention keeps both ("hybrid" / "hybrid_sliding").
        attention_kind = "hybrid" if attention_window is None else "hybrid_sliding"
        self.layer_types = [
            attention_kind if i in self.attention_layer_indices else "linear_attention"
            for i in range(num_hidden_layers)
        ]
        self.sliding_window = attention_window
        self.is_causal = not bidirectional
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def attention_layer_indices(self) -> list[int]:
        """Indices of the blocks that carry self-attention."""
        spec, n = self.attention_layers, self.num_hidden_layers
        if spec == "all":
            return list(range(n))
        if spec == "none":
            return []
        if isinstance(spec, int):
            return [i for i in range(n) if (i + 1) % spec == 0]
        return sorted(set(spec))

    @property
    def num_recurrent_states(self) -> int:
        """LSTMs carry two states (h, c); the other cells one (minLSTM's output is its state)."""
        return 2 if self.rnn_type == "lstm" else 1

    def _validate_fields(self):
        def fail(field, message):
            raise ValueError(f"HybridRnnLmConfig.{field}: {message}")

        positive_fields = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "scan_chunk_size",
        )
        for field in positive_fields:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(field, f"must be a positive integer, got {value!r}")
        if self.vocab_size > MAX_VOCAB_SIZE:
            fail("vocab_size", f"{self.vocab_size:,} is more than {MAX_VOCAB_SIZE:,} tokens; check the value")
        for field in ("use_residual", "bidirectional", "tie_word_embeddings", "use_cache"):
            value = getattr(self, field)
            if not isinstance(value, bool):
                fail(field, f"must be True or False, got {value!r}")
        if self.rnn_type not in RNN_TYPES:
            fail("rnn_type", f"must be one of {', '.join(repr(t) for t in RNN_TYPES)}, got {self.rnn_type!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in ACT2FN:
            fail(
                "hidden_act",
                f"must be one of transformers' activations ({', '.join(ACT2FN)}), got {self.hidden_act!r}",
            )
        if self.hidden_size % self.num_attention_heads != 0:
            fail(
                "num_attention_heads",
                f"{self.num_attention_heads} heads do not divide hidden_size={self.hidden_size}; "
                "pick a number of heads that divides it",
            )
        spec = self.attention_layers
        if isinstance(spec, str):
            if spec not in ("all", "none"):
                fail("attention_layers", f"must be 'all', 'none', an int k (every k-th layer) or a list, got {spec!r}")
        elif isinstance(spec, int) and not isinstance(spec, bool):
            if not 1 <= spec <= self.num_hidden_layers:
                fail("attention_layers", f"every-k-th layer needs 1 <= k <= num_hidden_layers, got k={spec}")
        elif isinstance(spec, list):
            bad = [i for i in spec if isinstance(i, bool) or not isinstance(i, int)]
            bad += [i for i in spec if isinstance(i, int) and not 0 <= i < self.num_hidden_layers]
            if bad:
                fail(
                    "attention_layers",
                    f"layer indices {bad} out of range: allowed 0..{self.num_hidden_layers - 1}",
                )
        else:
            fail("attention_layers", f"must be 'all', 'none', an int or a list of ints, got {spec!r}")
        window = self.attention_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            fail("attention_window", f"must be None (full attention) or an integer >= 1, got {window!r}")
        for field in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                fail(field, f"must be a probability in [0, 1), got {value!r}")
        for field in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, field)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                fail(field, f"must be a finite number > 0, got {value!r}")
        for field in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, field)
            ids = value if isinstance(value, list) and field == "eos_token_id" else [value]
            if value is not None and not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids):
                fail(field, f"must be None or an id in [0, vocab_size={self.vocab_size}), got {value!r}")


__all__ = ["HybridRnnLmConfig"]
