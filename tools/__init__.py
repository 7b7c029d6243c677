"""longkd.tools: inspection, evaluation, analyses, benchmarks, tiny models and the toy world."""
