"""Training, evaluation and publishing tools for hybrid_rnn_lm (the `hybrid-lm` command)."""
