"""evals: zero-shot GLUE/SuperGLUE through lm-eval, and validation perplexity."""
