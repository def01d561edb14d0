"""A data problem that names where it is (file:line) and what is wrong."""


class DataError(ValueError):
    def __init__(self, where: str, problem: str):
        self.where, self.problem = where, problem
        super().__init__(f"{where}: {problem}")
