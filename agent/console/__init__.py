"""Merchant interfaces served by the daemon: the web console (this package), and the launcher
that starts it with the Prometheus endpoint (agent/metrics.py) and the Telegram bot
(agent/telegram_bot.py) when the config asks for them. All off by default."""
