"""Answer-quality evaluation: teacher-forced answer loss, generation metrics, the generalization matrix."""
