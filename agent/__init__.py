"""kami-agent: exactly-once delivery of card keys (卡密) for small merchants."""

__version__ = "0.1.0"
