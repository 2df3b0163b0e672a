"""Small-scale reproductions of each paper's headline claim, trained with gapwatch attached."""
