"""longkd: an offline teacher-logit cache plus a lightweight student trainer.

A long-context teacher runs once over short samples packed into long windows and its
per-position log-probs are cached (``longkd cache build``); many students are then
distilled from that cache (``longkd train``). See README.md for the commands.
"""

__version__ = "0.1.0"
