"""Generated datasets: motion classes for classification (``motion``) and an AVA-format set for detection
(``ava``), each made once into a folder that says when it is complete."""
