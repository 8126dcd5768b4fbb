"""From checked inputs to finished jobs: plan (pure), write the run folder, render, execute, and the job runner."""
