"""A small closed-loop HTTP load generator for the gpt2-serve API (`python -m loadtest.run`)."""
