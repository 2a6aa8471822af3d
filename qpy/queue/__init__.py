"""qpy.queue"""
