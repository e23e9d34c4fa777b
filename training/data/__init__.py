"""What the training loop reads: text and image augmentation, the collator and its statistics, and
the dataset columns it adds (lengths, undecoded images)."""
