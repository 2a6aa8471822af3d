"""qpy: a mail transfer agent in the qmail tradition."""
