"""repeft: parameter-efficient fine-tuning adapters for Hugging Face models."""

__version__ = "0.1.0"
