"""Everything that makes the lesson files robust without being the lesson: see README.md here."""
