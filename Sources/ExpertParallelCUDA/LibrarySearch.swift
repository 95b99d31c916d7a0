/// Where the dynamically opened CUDA libraries are looked for.
package enum LibrarySearch {
    /// Candidates for `fileName` from an environment variable naming either the file
    /// itself or a directory that holds it.
    package static func fromEnvironment(_ variable: String, fileName: String) -> [String] {
        guard let path = Environment.value(variable) else { return [] }
        return [Environment.isDirectory(path) ? join(path, fileName) : path]
    }

    /// Library folders of NVIDIA's Python wheels (`nvidia-cuda-nvrtc`, `nvidia-nccl-cu13`, …)
    /// that contain `fileName`, e.g. `nvidia/cu13/lib` or `nvidia/cuda_nvrtc/lib`.
    /// Site-packages folders are found by scanning the usual places first; Python itself is
    /// asked only when that finds nothing.
    package static func pythonWheelCandidates(fileName: String, wheelFolders: [String]) -> [String] {
        func matches(in sites: [String]) -> [String] {
            var found: [String] = []
            for site in sites {
                for folder in wheelFolders {
                    let path = join(join(site, folder), fileName)
                    if Environment.isFile(path) && !found.contains(path) { found.append(path) }
                }
            }
            return found
        }
        let scanned = matches(in: scannedSitePackages())
        if !scanned.isEmpty { return scanned }
        return matches(in: sitePackagesReportedByPython())
    }

    /// Site-packages folders of virtual environments, pyenv versions, the user site and the
    /// system interpreters, without running Python.
    static func scannedSitePackages() -> [String] {
        var prefixes: [String] = []
        for variable in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
            if let prefix = Environment.value(variable) { prefixes.append(prefix) }
        }
        if let home = Environment.homeDirectory {
            prefixes.append(join(home, ".local"))
            let pyenvRoot = Environment.value("PYENV_ROOT") ?? join(home, ".pyenv")
            let versions = join(pyenvRoot, "versions")
            prefixes += Environment.directoryEntries(versions).map { join(versions, $0) }
        }
        prefixes += ["/usr/local", "/usr", "/opt/conda"]
        var sites: [String] = []
        for prefix in prefixes {
            for lib in ["lib", "lib64"] {
                let libDir = join(prefix, lib)
                for python in Environment.directoryEntries(libDir) where python.hasPrefix("python3") {
                    for kind in ["site-packages", "dist-packages"] {
                        let site = join(join(libDir, python), kind)
                        if Environment.isDirectory(site) { sites.append(site) }
                    }
                }
            }
        }
        return sites
    }

    static func sitePackagesReportedByPython() -> [String] {
        let script = "import site,sys;print(\"\\n\".join(site.getsitepackages()+[site.getusersitepackages()]))"
        guard let output = Environment.output(of: "python3", ["-c", script]) else { return [] }
        return output.split(separator: "\n").map(String.init).filter(Environment.isDirectory)
    }

    static func join(_ directory: String, _ name: String) -> String {
        directory.hasSuffix("/") ? directory + name : directory + "/" + name
    }
}
