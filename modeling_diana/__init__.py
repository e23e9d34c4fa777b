"""DiaNA: chat-based person retrieval."""
