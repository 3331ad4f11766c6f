"""Small shared helpers: config, atomic I/O, logging, distributed. Imports nothing of the project."""
