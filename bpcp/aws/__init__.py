"""AWS: data on S3 (and the run folder's copy there), EC2 workers and their launch templates."""
