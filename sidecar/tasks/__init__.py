"""One module per task (what it encodes, takes from a forward pass and answers), tokenization
and request checks; the registry finds a task by model or by request."""
