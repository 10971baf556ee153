package kiln.demo.web;

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;

import java.io.IOException;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.time.Instant;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;

/**
 * The demo web service of the example image: plain JDK, no dependencies.
 *
 * <p>GET /health answers 200 "ok" for the load balancer's health check and the bake's
 * smoke test; GET / answers a greeting. It listens on $PORT (default 8080) and stops
 * cleanly on SIGTERM, which is how upstart stops it.
 */
public final class WebDemo {
    private WebDemo() {}

    public static void main(String[] args) throws IOException {
        int port = Integer.parseInt(env("PORT", "8080"));
        HttpServer server = HttpServer.create(new InetSocketAddress(port), 128);
        server.createContext("/health", exchange -> respond(exchange, 200, "ok\n"));
        server.createContext("/", exchange -> {
            if ("/".equals(exchange.getRequestURI().getPath())) {
                respond(exchange, 200, "hello from web-demo\n");
            } else {
                respond(exchange, 404, "not found\n");
            }
        });
        ExecutorService workers = Executors.newFixedThreadPool(8);
        server.setExecutor(workers);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            log("stopping");
            server.stop(5);
            workers.shutdown();
        }));
        server.start();
        log("listening on port " + port);
    }

    private static void respond(HttpExchange exchange, int status, String body) throws IOException {
        byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
        exchange.getResponseHeaders().set("Content-Type", "text/plain; charset=utf-8");
        if ("HEAD".equals(exchange.getRequestMethod())) {
            exchange.sendResponseHeaders(status, -1);
        } else {
            exchange.sendResponseHeaders(status, bytes.length);
            try (OutputStream out = exchange.getResponseBody()) {
                out.write(bytes);
            }
        }
        exchange.close();
    }

    private static String env(String name, String fallback) {
        String value = System.getenv(name);
        return value == null || value.isEmpty() ? fallback : value;
    }

    private static void log(String message) {
        System.out.println(Instant.now() + " web-demo: " + message);
    }
}
