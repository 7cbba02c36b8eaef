"""Data: reading forget/retain files, tokenisation with answer-only labels, and Hub benchmark loaders."""
