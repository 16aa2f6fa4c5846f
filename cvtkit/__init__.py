"""cvtkit: distributed pretraining of convolutional vision transformers (CvT, CeiT)."""

__version__ = "0.1.0"
