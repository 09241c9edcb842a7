"""Training one config: the trainer, checkpoints, the evaluation suite, pictures, the local run folder.

The one trainer serves Ray trials, pack servers, local runs and reproductions alike.
"""
