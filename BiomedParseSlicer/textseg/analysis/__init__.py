"""What is measured on segments: statistics, the model's confidence, and people's corrections."""
