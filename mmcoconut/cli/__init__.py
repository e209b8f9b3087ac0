"""Command-line tools: each module is an argument parser (torch-free) and a `main` that calls the library."""
