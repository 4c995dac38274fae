"""The Gradio front end of VTW Chat. It never touches tensors: everything goes through vtw_core."""
