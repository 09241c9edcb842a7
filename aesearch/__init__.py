"""aesearch: hyperparameter search for autoencoders."""
