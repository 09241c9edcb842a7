"""The parts an autoencoder run is composed of: data, models, objectives, corruption, optimizers.

Each part owns a registry of named implementations and its own section of the config; a
variant is a choice of parts, never a class of its own.
"""
