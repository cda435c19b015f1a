"""MedFMSlicerLib: helpers that only make sense inside the Slicer application (not the engine).

Unlike ``MedFMSegmentLib`` / ``MedFMTrainLib`` these modules may use ``slicer``; they import it inside
functions so that their pure parts are tested without the application.
"""
