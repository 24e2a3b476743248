"""kvconfig: an event-driven, durable, revisioned configuration server on Twisted."""

__version__ = "0.1.0"
