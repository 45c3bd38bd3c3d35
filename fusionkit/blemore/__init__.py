"""BlEmoRE, the challenge: its answer format, metrics, decoding rules and submissions (NumPy only, so that the runtime imports them)."""
