"""train: the CHTsL trainer, the CHTs topology engine, data and tokenizer pipeline, LR schedule."""
