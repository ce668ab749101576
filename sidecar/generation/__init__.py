"""Generation: sampling, streamed text, chat prompts, and the decode scheduler."""
