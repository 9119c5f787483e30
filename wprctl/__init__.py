"""wprctl: the RLHF pipeline of "Semantic-aware Wasserstein Policy Regularization" in one tool."""

__version__ = "0.1.0"
