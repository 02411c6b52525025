"""pesc: toolkit for the NLPCC 2025 Personalized Emotional Support Conversation task."""

__version__ = "0.1.0"
