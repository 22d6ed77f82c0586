"""hdpissa_trl: HD-PiSSA (High-rank Distributed PiSSA) for Hugging Face TRL."""

__version__ = "0.1.0"
