"""A small next-token language model with padded sequences and a per-token mask.

``fit(tokens[:, :-1], tokens[:, 1:], sample_weight=mask)``: labels ``[batch, seq]``,
logits ``[batch, seq, vocab]``, and a ``[batch, seq]`` mask that is 0 on padding. The loss
is the mean over real tokens, sum(w * loss) / sum(w), and accuracy is per real token.

Run:  python examples/language_model.py
"""

import haiku as hk
import numpy as np
import optax

import hkfit

VOCAB, LENGTH, PAD = 12, 16, 0


def sequences(rows, seed):
    """Counting sequences (t, t+1, t+2, ... mod VOCAB-1, never PAD) of random lengths."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, VOCAB - 1, size=(rows, 1))
    tokens = 1 + (starts + np.arange(LENGTH + 1)) % (VOCAB - 1)
    lengths = rng.integers(4, LENGTH + 2, size=rows)
    tokens[np.arange(LENGTH + 1)[None] >= lengths[:, None]] = PAD
    mask = (tokens[:, 1:] != PAD).astype(np.float32)
    return tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32), mask


def forward(tokens):
    """Embeddings, a causal LSTM over the sequence, and logits for the next token."""
    h = hk.Embed(VOCAB, 32)(tokens)
    core = hk.LSTM(64)
    h, _ = hk.dynamic_unroll(core, h, core.initial_state(tokens.shape[0]), time_major=False)
    return hk.Linear(VOCAB)(h)


def main():
    x, y, mask = sequences(512, seed=0)
    x_test, y_test, mask_test = sequences(128, seed=1)
    model = hkfit.Model(
        forward,
        loss="sparse_categorical_crossentropy",
        optimizer=optax.adam(1e-2),
        weighted_metrics=["accuracy"],  # per real token: padding tokens weigh 0
        seed=0,
    )
    model.fit(x, y, sample_weight=mask, epochs=8, batch_size=32, verbose=0)
    test = model.evaluate(x_test, y_test, sample_weight=mask_test, verbose=0)
    print(f"test loss {test['loss']:.3f} nats/token - token accuracy {test['accuracy']:.3f}")
    assert test["accuracy"] > 0.9  # counting is learnable; chance is 1/11
    return test


if __name__ == "__main__":
    main()
